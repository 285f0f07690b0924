"""Child process of test_edr_file_limit: EDR lines written while the process has no
free file descriptor, then the table freed. Prints what the writer reported, as JSON."""

from __future__ import annotations

import json
import os
import resource
import sys

from extrabalance.observability import EDR_BUFFER_MAX, EdrWriter


def main() -> None:
    directory = sys.argv[1]
    edr = EdrWriter(directory, "node-1", clock=lambda: 1_764_000_000.0)
    written = 0

    def line(kind: str) -> None:
        nonlocal written
        written += 1
        edr.write(kind, {"msisdn": "201001234567", "reason": f"line-{written}"})

    line("loan")
    edr.flush()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    hog = []
    try:
        while True:
            hog.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    flushes_ok = []
    for _ in range(5):  # refusal EDRs while the table is full, a flush after each
        line("refusal")
        flushes_ok.append(edr.flush())
    for _ in range(EDR_BUFFER_MAX + 10):  # and enough to force flushes from write()
        line("ad_suppressed")
    during = edr.health()
    for fd in hog:
        os.close(fd)
    recovered = edr.flush()
    print(
        json.dumps(
            {
                "written": written,
                "flushes_ok": flushes_ok,
                "during": during,
                "recovered": recovered,
                "after": edr.health(),
            }
        )
    )


if __name__ == "__main__":
    main()
