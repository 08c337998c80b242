"""A fixture server: prints "ready", then one line per signal it receives; exits 3 on SIGTERM.

Used black-box (like tini's and dumb-init's tests) to see exactly what nswrap forwards.
"""

import signal
import sys
import time

ECHOED = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


def on_signal(signum, frame):
    print(f"got {signal.Signals(signum).name}", flush=True)
    if signum == signal.SIGTERM:
        sys.exit(3)


for s in ECHOED:
    signal.signal(s, on_signal)
print("ready", flush=True)
deadline = time.monotonic() + 120  # bounded: never outlive a broken test by much
while time.monotonic() < deadline:
    signal.pause() if hasattr(signal, "pause") else time.sleep(1)
sys.exit(4)
