"""Data intake: the shop's data contract and how it comes in.

Schema of the canonical frames, ``Dataset`` (save/load, fingerprint), the loaders (a shop's
own export under the contract, Amazon Beauty, Online Retail, CDNOW), the streaming ingest of
event logs bigger than memory, the generated event log and the synthetic shops, and the
``ecomrec data`` commands. Imports only ``ecomrec.errors`` / ``ecomrec.config`` of ours.
"""
