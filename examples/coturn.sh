#!/bin/sh
# coturn (STUN/TURN) under nswrap. A TURN server tells its clients its public address (its relays'
# XOR-RELAYED-ADDRESS, STUN's RESPONSE-ORIGIN); inside nswrap's namespace it only has a private
# one, so it is given the host's from NSWRAP_HOST_ADDRESSES (README, "The host's public side"):
#
#     nswrap -p 3478,3478/tcp,49152-49407 -u eth0 -- examples/coturn.sh
#
# Relays are allocated in 49152-49407 (published too). One public address per coturn: a host with
# several runs one nswrap per address (--address ADDR) with this script each; arguments given to
# the script go to turnserver. turnserver listens on IPv4 and IPv6, but its relays carry the
# family of that one address: for IPv6 relays, run a second nswrap with --address <IPv6 address>.
set -eu
public=${NSWRAP_HOST_ADDRESSES%% *}   # the first published address
exec turnserver --listening-port 3478 --min-port 49152 --max-port 49407 \
    --external-ip "$public" --fingerprint --no-cli --log-file stdout "$@"
