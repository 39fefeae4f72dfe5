"""The Hugging Face Hub: the only downloader (download), the only uploader (upload), the push
preflight (access: may the token write the repo) and the one retry rule they all follow (retry).
Imports only core.
"""
