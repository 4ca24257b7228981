#!/bin/sh
# pipeserve container entry point: the first argument picks the role, the
# rest are that binary's flags.
#   coordinator [--launcher=static --stage_servers=...]
#   stage_server [--port=9000 --device=auto]
#   pipeserve <subcommand> ...           (the CLI)
set -e
role=${1:-coordinator}
[ $# -gt 0 ] && shift
case "$role" in
  coordinator|stage_server|pipeserve) exec "/usr/local/bin/$role" "$@" ;;
  *) echo "unknown role '$role' (coordinator, stage_server or pipeserve)" >&2; exit 2 ;;
esac
