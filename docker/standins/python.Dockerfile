# Stand-in for the official python:3.11-slim, for machines that cannot reach a Docker registry
# (tools/docker_bases.py builds it, tagged python:3.11-slim, only when that tag cannot be pulled).
# Debian bookworm's python3 (3.11.2) from a debootstrap root file system, made to look like the
# official image where this project relies on it: `python` and `pip` on PATH from /usr/local
# (a venv there, so pip installs into /usr/local as in the official image), a UTF-8 locale.
ARG BASE
FROM ${BASE}
LABEL cifar-svc.standin="python:3.11-slim built from Debian bookworm by tools/docker_bases.py"
ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
RUN python3 -m venv /usr/local && python --version && pip --version
CMD ["python3"]
