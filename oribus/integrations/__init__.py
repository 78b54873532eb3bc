"""Adapters that put oribus under the frameworks agents are already written in.

Each lives in its own subpackage behind an optional extra (``pip install
'oribus[langgraph]'``) and uses only the public SDK (``oribus``, ``oribus.client``,
``oribus.errors``, ``oribus.types``): an integration is a client like any other
(specs/ARCHITECTURE.md, "Which layer may import which").
"""
