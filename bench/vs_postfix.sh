#!/usr/bin/env bash
# Benchmark: Postroom against Postfix on the same machine, with the same load, in one run.
#
# Starts, all on 127.0.0.1 and all private to this run (a temporary directory, removed at the end):
#   - two smtp-sinks (Postfix's test SMTP server): one stands for Postfix's next hop, one for
#     Postroom's;
#   - a Postfix instance of its own (`postfix -c DIR`: its own main.cf, master.cf, queue and data
#     directories; smtpd on a loopback port; `relayhost` = the first sink). The machine's own
#     Postfix and /etc/postfix are never touched or read for configuration;
#   - a Postroom (`postroom init` + `postroom serve` in the same directory; 127.0.0.0/8 trusted to
#     relay; a smarthost route `[delivery.routes."*"]` to the second sink, opportunistic TLS,
#     which the sink does not offer; 20 connections per destination like Postfix's
#     default_destination_concurrency_limit). DKIM is off on both sides (no keys, no milter).
# Then, interleaved (round 1: Postfix then Postroom; round 2 the other way round; ...), the same
# smtp-source load against each: 20 sessions, ~3 KB messages, one recipient, a new connection per
# message (smtp-source's default). For each it prints
#   accepted msgs/s    = messages / time until smtp-source got its last 250 and quit
#   end-to-end msgs/s  = messages / time until that system's sink had received them all
# and, at the end, the median of each figure and the ratios Postroom / Postfix.
# It stops only what it started (by process id) and leaves nothing running.
#
# Usage (from the project root; root is needed to install and run Postfix):
#   bench/vs_postfix.sh                 # small: 2,000 messages, 1 round
#   bench/vs_postfix.sh 20000 3         # full size: 20,000 messages, 3 rounds
#   POSTROOM=/path/to/postroom bench/vs_postfix.sh
#   SMTP_WORKERS=0 bench/vs_postfix.sh  # Postroom's smtp.workers (default "auto")
#   EVENT_LOOP=asyncio bench/vs_postfix.sh  # Postroom's server.event_loop (default "auto")
# Postfix is installed from the distribution's packages when missing (Debian/Ubuntu: apt-get,
# with "No configuration" preseeded, so nothing of it starts or gets configured).

set -euo pipefail

MESSAGES=${1:-2000}
ROUNDS=${2:-1}
WORKERS=${SMTP_WORKERS:-auto}
EVENT_LOOP=${EVENT_LOOP:-auto}
[[ $WORKERS =~ ^[0-9]+$ ]] || WORKERS="\"$WORKERS\""  # a TOML string: "auto"
SESSIONS=20
SIZE=3000
SENDER=bench@acme.test
RECIPIENT=user@example.test
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
POSTROOM=${POSTROOM:-$ROOT/.venv/bin/postroom}

die() { echo "vs_postfix: $*" >&2; exit 2; }

[[ $MESSAGES =~ ^[1-9][0-9]*$ ]] || die "messages must be a positive number, not '$MESSAGES'"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "rounds must be a positive number, not '$ROUNDS'"
[[ -x $POSTROOM ]] || die "no postroom at $POSTROOM (make the virtualenv, or set POSTROOM=...)"
[[ $(id -u) -eq 0 ]] || die "run as root: a Postfix instance needs it (its daemons drop privileges)"

# -- Postfix from the distribution ----------------------------------------------------------
if ! command -v postfix >/dev/null || ! command -v smtp-source >/dev/null \
        || ! command -v smtp-sink >/dev/null; then
    command -v apt-get >/dev/null || die "install Postfix (postfix, smtp-source, smtp-sink) first"
    echo "installing Postfix from the distribution's packages (no configuration)..."
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix >/dev/null
fi
PATH=$PATH:/usr/sbin

# -- what we start, and how we stop it --------------------------------------------------------
WORK=$(mktemp -d /tmp/vs-postfix.XXXXXX)
chmod 755 "$WORK"  # Postfix's daemons run as the postfix user and must reach their queue
PIDS=()
POSTFIX_STARTED=
POSTROOM_PID=

cleanup() {
    local code=$?
    trap - EXIT INT TERM
    if [[ -n $POSTROOM_PID ]] && kill -0 "$POSTROOM_PID" 2>/dev/null; then
        kill -TERM "$POSTROOM_PID" 2>/dev/null || true
        wait "$POSTROOM_PID" 2>/dev/null || true
    fi
    if [[ -n $POSTFIX_STARTED ]]; then
        postfix -c "$WORK/postfix" stop >/dev/null 2>&1 || true
        local master
        master=$(cat "$WORK/postfix-queue/pid/master.pid" 2>/dev/null | tr -d ' ' || true)
        for _ in $(seq 100); do
            [[ -n $master ]] && kill -0 "$master" 2>/dev/null || break
            sleep 0.1
        done
        if [[ -n $master ]] && kill -0 "$master" 2>/dev/null; then
            postfix -c "$WORK/postfix" abort >/dev/null 2>&1 || true
        fi
    fi
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    [[ -n ${KEEP_WORK:-} ]] || rm -rf "$WORK"
    exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
trap 'echo "vs_postfix: failed at line $LINENO: $BASH_COMMAND" >&2' ERR

free_ports() {  # N free TCP ports on 127.0.0.1 (asked of the kernel, released at once)
    "$ROOT/.venv/bin/python" - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

wait_port() {  # wait_port PORT NAME: until something accepts connections there (60 s)
    for _ in $(seq 600); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    die "$2 did not listen on 127.0.0.1:$1 within 60 s"
}

sink_count() {  # messages an smtp-sink has received so far (its -c counter, last update)
    tail -c 100 "$1" 2>/dev/null | tr '\r' '\n' | grep -o 'mesg=[0-9]*' | tail -n 1 \
        | cut -d= -f2 || true
}

sink_sessions() {
    tail -c 100 "$1" 2>/dev/null | tr '\r' '\n' | grep -o 'sess=[0-9]*' | tail -n 1 \
        | cut -d= -f2 || true
}

read -r PF_PORT PF_SINK_PORT PR_PORT PR_SINK_PORT <<<"$(free_ports 4)"

start_sink() {  # start_sink PORT FILE
    smtp-sink -u nobody -c "127.0.0.1:$1" 512 >"$2" 2>&1 &
    PIDS+=($!)
    wait_port "$1" "smtp-sink"
}
start_sink "$PF_SINK_PORT" "$WORK/postfix-sink.out"
start_sink "$PR_SINK_PORT" "$WORK/postroom-sink.out"

# -- a private Postfix ----------------------------------------------------------------------------
# Queue and data outside the config directory: postfix-script wants that owned by root only.
mkdir -p "$WORK/postfix" "$WORK/postfix-queue" "$WORK/postfix-data"
chown postfix "$WORK/postfix-data"
cat >"$WORK/postfix/main.cf" <<EOF
# A private instance for this benchmark only: loopback, its own queue, relays all to a sink.
compatibility_level = 3.6
queue_directory = $WORK/postfix-queue
data_directory = $WORK/postfix-data
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-bench
maillog_file = $WORK/postfix.log
maillog_file_prefixes = $WORK
myhostname = postfix-bench.test
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
relayhost = [127.0.0.1]:$PF_SINK_PORT
smtp_dns_support_level = disabled
smtp_tls_security_level = none
smtpd_tls_security_level = none
biff = no
EOF
# The standard services (as the distribution's master.cf has them), without chroot (a chroot
# would need copies of /etc files in the queue directory), smtpd on our loopback port only.
cat >"$WORK/postfix/master.cf" <<EOF
127.0.0.1:$PF_PORT inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
POSTFIX_STARTED=1
if ! postfix -c "$WORK/postfix" start >"$WORK/postfix-start.out" 2>&1; then
    cat "$WORK/postfix-start.out" >&2
    die "the private Postfix did not start"
fi
wait_port "$PF_PORT" "Postfix"

# -- a private Postroom ----------------------------------------------------------------------
mkdir -p "$WORK/postroom"
cat >"$WORK/postroom/postroom.toml" <<EOF
[server]
data_dir = "$WORK/postroom/data"
hostname = "postroom-bench.test"
event_loop = "$EVENT_LOOP"

[smtp]
listen = ["127.0.0.1:$PR_PORT"]
trusted_networks = ["127.0.0.0/8"]
workers = $WORKERS  # SMTP worker processes (0: the service process runs the sessions)

[api]
listen = "127.0.0.1:0"

[policy]
allow_unconfigured_domains = true  # smtp-source sends from a domain never added

[delivery]
dns_nameservers = ["127.0.0.1:1"]
max_connections_per_destination = 20  # Postfix's default_destination_concurrency_limit

[delivery.routes."*"]
host = "127.0.0.1"
port = $PR_SINK_PORT
tls = "opportunistic"
EOF
# POSTROOM_* variables would override the private config: leave them out.
PR_ENV=(env)
for name in $(compgen -e | grep '^POSTROOM_' || true); do PR_ENV+=(-u "$name"); done
"${PR_ENV[@]}" "$POSTROOM" --config "$WORK/postroom/postroom.toml" init >"$WORK/postroom-init.out" 2>&1 \
    || { cat "$WORK/postroom-init.out" >&2; die "postroom init failed"; }
"${PR_ENV[@]}" "$POSTROOM" --config "$WORK/postroom/postroom.toml" serve \
    >"$WORK/postroom.log" 2>&1 </dev/null &
POSTROOM_PID=$!
wait_port "$PR_PORT" "Postroom"
# The port listens before the SMTP workers do: wait for the line that says all of it is ready.
for _ in $(seq 600); do
    grep -q "postroom ready" "$WORK/postroom.log" && break
    sleep 0.1
done
grep -q "postroom ready" "$WORK/postroom.log" || die "Postroom did not get ready within 60 s"

# -- the runs ----------------------------------------------------------------------------------
now() { date +%s.%N; }
RESULTS=()

run_one() {  # run_one NAME PORT SINKFILE
    local name=$1 port=$2 sink=$3 before target t0 t1 t2 count deadline
    before=$(sink_count "$sink"); before=${before:-0}
    local sessions_before; sessions_before=$(sink_sessions "$sink"); sessions_before=${sessions_before:-0}
    target=$((before + MESSAGES))
    t0=$(now)
    if ! smtp-source -s "$SESSIONS" -l "$SIZE" -m "$MESSAGES" -M client.bench.test \
            -f "$SENDER" -t "$RECIPIENT" "127.0.0.1:$port" >"$WORK/source.out" 2>&1; then
        cat "$WORK/source.out" >&2
        die "smtp-source against $name failed"
    fi
    t1=$(now)
    deadline=$(awk -v t="$t1" -v n="$MESSAGES" 'BEGIN { printf "%d", t + 120 + n / 20 }')
    while :; do
        count=$(sink_count "$sink"); count=${count:-0}
        ((count >= target)) && break
        if (($(date +%s) > deadline)); then
            die "$name: its sink has $((count - before)) of $MESSAGES messages after the deadline"
        fi
        sleep 0.02
    done
    t2=$(now)
    local sessions; sessions=$(sink_sessions "$sink"); sessions=${sessions:-0}
    awk -v name="$name" -v n="$MESSAGES" -v t0="$t0" -v t1="$t1" -v t2="$t2" \
        -v s=$((sessions - sessions_before)) 'BEGIN {
        printf "%-8s accepted %7.1f msgs/s (%.2f s)   end-to-end %7.1f msgs/s (%.2f s)   " \
               "sink sessions ended: %d\n", name, n / (t1 - t0), t1 - t0,
               n / (t2 - t0), t2 - t0, s }'
    RESULTS+=("$name $(awk -v n="$MESSAGES" -v t0="$t0" -v t1="$t1" -v t2="$t2" \
        'BEGIN { printf "%.3f %.3f", n / (t1 - t0), n / (t2 - t0) }')")
}

echo "vs_postfix: $MESSAGES messages x $ROUNDS round(s); smtp-source: $SESSIONS sessions," \
     "$SIZE B, 1 recipient, a new connection per message; Postroom smtp.workers = $WORKERS" \
     "($(grep -o 'loop=[a-z]* smtp_workers=[0-9,-]*' "$WORK/postroom.log" | head -1))"
echo "machine: $(nproc) CPUs, $(postconf -d mail_version 2>/dev/null | cut -d' ' -f3- | \
     sed 's/^/Postfix /'), Postroom $("$POSTROOM" --version 2>/dev/null | awk '{print $NF}'), \
load average $(cut -d' ' -f1-3 /proc/loadavg), speed $(python3 "$ROOT/bench/_postroom.py" speed) ms \
(bench/_postroom.py speed_ms: lower is faster)"
for round in $(seq "$ROUNDS"); do
    echo "round $round"
    if ((round % 2)); then
        run_one Postfix "$PF_PORT" "$WORK/postfix-sink.out"
        run_one Postroom "$PR_PORT" "$WORK/postroom-sink.out"
    else
        run_one Postroom "$PR_PORT" "$WORK/postroom-sink.out"
        run_one Postfix "$PF_PORT" "$WORK/postfix-sink.out"
    fi
done

printf '%s\n' "${RESULTS[@]}" | awk '
    function median(list, k,   a, n, i, j, t) {
        n = split(list, a, " ")
        for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) {
            t = a[j]; a[j] = a[j - 1]; a[j - 1] = t
        }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    { acc[$1] = acc[$1] " " $2; e2e[$1] = e2e[$1] " " $3 }
    END {
        pa = median(acc["Postfix"]); pe = median(e2e["Postfix"])
        ra = median(acc["Postroom"]); re = median(e2e["Postroom"])
        printf "median   Postfix: accepted %.1f msgs/s, end-to-end %.1f msgs/s\n", pa, pe
        printf "median   Postroom: accepted %.1f msgs/s, end-to-end %.1f msgs/s\n", ra, re
        printf "ratio Postroom/Postfix: accepted %.2fx (target >= 2), end-to-end %.2fx (target >= 1.5)\n",
               ra / pa, re / pe
    }'

if grep -Eq ' (ERROR|CRITICAL) ' "$WORK/postroom.log"; then
    echo "postroom logged errors; the first:"
    grep -E -m 1 ' (ERROR|CRITICAL) ' "$WORK/postroom.log"
fi
