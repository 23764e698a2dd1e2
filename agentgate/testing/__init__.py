"""Test doubles and harnesses, shipped in the package so tests, the demo and the benchmarks share
them: a fake Home Assistant, a fake Telegram Bot API, a scripted guardian, a real gateway on
127.0.0.1 (in-process or as a subprocess) and the official MCP client pointed at it.

Imports: nothing itself (each module says what it imports).
"""
