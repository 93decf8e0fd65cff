#!/bin/sh
# nginx's configuration from the template, with the app's request size limit from the same
# environment variable the web tier reads (so the two cannot disagree), then nginx itself.
set -e
max="${MAX_REQUEST_BYTES:-268435456}"
case "$max" in ''|*[!0-9]*) echo "MAX_REQUEST_BYTES must be a number of bytes, not '$max'" >&2; exit 2 ;; esac
sed "s/@MAX_REQUEST_BYTES@/$max/" /etc/nginx/nginx.conf.template > /tmp/nginx.conf
# -e: log to stderr from the first line (nginx opens its built-in log path before reading the config).
exec nginx -e stderr -c /tmp/nginx.conf -g 'daemon off;'
