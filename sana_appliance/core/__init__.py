"""The bottom room: what every other room may use and nothing here imports from them.

errors (typed user errors, exit codes), fsutil (atomic files and folders), parsing (strings to
booleans and numbers), workspace (the volume layout, credentials, Hub settings, redaction).
"""
