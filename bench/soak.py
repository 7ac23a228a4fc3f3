"""The long soak: file streams on every request queue while queue workers are SIGKILLed.

    .venv/bin/python bench/soak.py --minutes 30 [--queues 2] [--kill-every 0.5] [--seed 1]

Starts pyvirtiofsd on a fresh share (tests/soak.py does the work), prints the closing figures:
requests served, workers killed, errors seen by the client, and the drift of the daemon's fd
counts and RSS from just after the warm-up to the end.  Exit status 1 if the client saw any
error or a kept file did not verify.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import soak
from tests.conftest import start_daemon


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--queues", type=int, default=2, help="request queues (one stream each)")
    p.add_argument("--kill-every", type=float, default=0.5,
                   help="mean seconds between two worker kills")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="pyvfs-soak-") as tmp:
        share = Path(tmp) / "share"
        share.mkdir()
        started = []

        def factory(*extra: str):
            d = start_daemon(share, str(Path(tmp) / "soak.sock"), *extra)
            started.append(d)
            return d

        try:
            result = soak.run(factory, share, args.minutes * 60, args.queues, args.kill_every,
                              args.seed)
        except BaseException:
            for d in started:
                d.stop()
                notable = [line for line in d.log if " ERROR " in line or " WARN " in line]
                sys.stderr.write("".join([*notable[-40:], "--- last lines\n", *d.log[-40:]]))
            raise
        finally:
            for d in started:
                d.stop()
    print(result.summary())
    return 1 if result.errors or result.files_verified == 0 else 0


if __name__ == "__main__":
    raise SystemExit(main())
