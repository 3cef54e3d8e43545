"""The echo backend for tests/autobahn.rs: Autobahn's own testee server (the
one `wstest -m testeeserver` runs, which accepts permessage-deflate, so cases
12 and 13 really run) on a port the OS picks, printed as `listening port=N`.

Python 2.7: it runs in the Autobahn venv that .ci/run installs.

`wstest -m testeeserver` itself cannot be used: it needs a fixed port in its
URL, and with one in the URL Autobahn refuses any handshake whose Host header
names another port, which is every handshake that comes through wsgate (the
client's Host is forwarded). With port 0 in the URL that check is off.
"""

import sys

# Installs the epoll reactor; it must come before anything imports Twisted's
# default reactor.
from autobahntestsuite import choosereactor  # noqa: F401

from twisted.internet import reactor
from autobahn.twisted.websocket import listenWS
from autobahntestsuite.testee import TesteeServerFactory


def main():
    factory = TesteeServerFactory("ws://127.0.0.1:0")
    port = listenWS(factory, interface="127.0.0.1")
    print("listening port=%d" % port.getHost().port)
    # The test waits for that line; stdout is a pipe, so it would sit in the buffer.
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main()
