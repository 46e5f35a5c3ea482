"""Stands between mpiexec and one rank that ``minimask.distributed.launch``
started, so that a rank killed outright (``kill -9``, the out-of-memory
killer) does not take the others' unsaved steps with it.

    mpiexec -n R python .../_rank_guard.py -m minimask train ...

MPICH's mpiexec kills every rank the moment one of its own children dies.
Here its child is this small process, which runs the real rank as its own
child (handing on the PMI connection) and waits. If the rank dies of a
signal, this tells the other ranks of the job (SIGUSR1, their process ids
are in ``$MINIMASK_RANK_PIDS``), writes ``killed-RANK`` there for the
launcher's message, and waits for them to save and leave before it exits
itself. Run as a file, not as ``-m minimask...``: it imports nothing heavy.
"""
import os
import signal
import subprocess
import sys
import time

WAIT_FOR_OTHERS_S = 120.0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (OSError, IndexError):
        return False


def main(argv) -> int:
    # Ctrl-C reaches this process's group - the rank too, which handles it
    for sig in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, lambda *_: None)
    fd = os.environ.get("PMI_FD", "")
    rank = os.environ.get("PMI_RANK", "?")
    child = subprocess.Popen([sys.executable, *argv],
                             pass_fds=(int(fd),) if fd.isdigit() else ())
    code = child.wait()
    folder = os.environ.get("MINIMASK_RANK_PIDS")
    if code < 0 and folder and os.path.isdir(folder):
        with open(os.path.join(folder, f"killed-{rank}"), "w") as f:
            f.write(f"{child.pid} {-code}")
        others = []
        for name in os.listdir(folder):
            if name.isdigit() and name != rank:
                with open(os.path.join(folder, name)) as f:
                    others.append(int(f.read()))
        for pid in others:
            try:
                os.kill(pid, signal.SIGUSR1)
            except OSError:
                pass
        deadline = time.time() + WAIT_FOR_OTHERS_S
        while any(_alive(pid) for pid in others) and time.time() < deadline:
            time.sleep(0.05)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
