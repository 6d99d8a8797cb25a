"""onem2m-rspf: Remote Security Provisioning for oneM2M (TS-0001 / TS-0003).

Layers (data flows down, never up):

* ``rspf.errors``, ``rspf.secret``, ``rspf.keys``, ``rspf.wire``, ``rspf.profile``: the sans-I/O core;
* ``rspf.tls``: the one module that touches pyOpenSSL / cffi (TLS-PSK, RFC 5705 exporter, peer identity);
* ``rspf.mef``: the M2M Enrolment Function (store, policy, transport kept apart);
* ``rspf.enrolee``: the Enrolee client library;
* ``rspf.cli``: the ``rspf`` command.
"""

__version__ = "0.1.0"
