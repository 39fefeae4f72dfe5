"""Processes: the launcher that starts one worker per GPU (launch) and the stop signals with the
ranks' stop vote (stopping). Imports only core.
"""
