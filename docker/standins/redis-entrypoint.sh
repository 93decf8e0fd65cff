#!/bin/sh
# The official redis image's conventions: a command starting with `-` is redis-server's options,
# and protected mode is off unless the command line sets it (appended, since a config file
# must stay redis-server's first argument).
set -e
case "$1" in -*) set -- redis-server "$@" ;; esac
if [ "$1" = redis-server ]; then
  case " $* " in
    *protected-mode*) ;;
    *) set -- "$@" --protected-mode no ;;
  esac
fi
exec "$@"
