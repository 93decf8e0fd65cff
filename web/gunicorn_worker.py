"""gunicorn's gevent worker with a deadline on every read and write of a client connection.

A request's head must arrive within gunicorn's keepalive time (web/gunicorn_conf.py); after that,
each read or write of the body may wait at most READ_TIMEOUT for the client (gevent's worker
would otherwise wait forever, holding the greenlet, the socket and what the request had read).
"""

from gunicorn.workers.base_async import AsyncWorker
from gunicorn.workers.ggevent import GeventWorker

READ_TIMEOUT = 30.0


class Worker(GeventWorker):
    def handle(self, listener, client, addr):
        client.settimeout(READ_TIMEOUT)  # GeventWorker.handle would set it blocking, without one
        AsyncWorker.handle(self, listener, client, addr)
