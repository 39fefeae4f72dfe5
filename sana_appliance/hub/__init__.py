"""The Hugging Face Hub: the only downloader (download), the only uploader (upload) and the one
retry rule both follow (retry). Imports only core.
"""
