"""FedML transports for the round contract (server and client managers).

FedML is imported lazily, only inside this subpackage, so the rest of lightning_fedprune never
pays its import cost. Install it with ``pip install 'lightning_fedprune[fedml]'``.
"""
