# Markdown tables from scripts/bench-compare.sh's JSON: jq -r -f bench-compare-report.jq FILE
# Ratios: the peer's figure divided by direct's / relay's figure in the same cell
# (msgs/s and conn/s: higher is better; latency, CPU and bytes: lower is better).

def fixed(n):
  if . == null then "–"
  else
    (. < 0) as $neg
    | ((if $neg then -. else . end) * pow(10; n) | round | tostring) as $s
    | (if n > 0 then ((("0" * (n + 1 - ($s | length))) // "") + $s) else $s end) as $p
    | (if n > 0 then $p[0:($p | length) - n] + "." + $p[($p | length) - n:] else $p end)
    | if $neg then "-" + . else . end
  end;
def si:
  if . == null then "–"
  elif . >= 1e6 then (. / 1e6 | fixed(2)) + " M"
  elif . >= 1e4 then (. / 1e3 | fixed(1)) + " k"
  else fixed(0) end;
def us: if . == null then "–" elif . >= 100 then fixed(0) elif . >= 10 then fixed(1) else fixed(2) end;
def ratio($a; $b): if $a == null or $b == null or $b == 0 then "–" else ($a / $b | fixed(2)) + "×" end;
def note:
  [ (if .ok == false then (.error // "failed") else empty end),
    (if (.proxy_runq_wait_pct // 0) > 5 then "proxy waited for CPU 0 \(.proxy_runq_wait_pct)% of the run" else empty end),
    (if .peer == "direct" and (.other_cpu1_pct // 0) > 5 then "other work on CPU 1: \(.other_cpu1_pct)% of the run" else empty end),
    (if .kernel_disturbed == true then "other processes opened/closed sockets during the cell (\(.tcp_sockets_per_conn) TCP sockets per connection): kernel figure unreliable" else empty end),
    (if (.runs_failed // 0) > 0 then "\(.runs_failed) of \(.runs_msgs_per_s | length) runs failed" else empty end),
    (if (.runs_msgs_per_s // [] | length) > 1 then "runs: " + (.runs_msgs_per_s | map(si) | join(", ")) else empty end),
    (if (.runs_connect_rate_per_s // [] | length) > 1 then "runs: " + (.runs_connect_rate_per_s | map(si) | join(", ")) + " conn/s" else empty end)
  ] | join("; ") | gsub("\\|"; "/") | gsub("\n"; " ");
def median: sort | if length == 0 then null elif length % 2 == 1 then .[length / 2 | floor] else (.[length / 2 - 1] + .[length / 2]) / 2 end;
# Round i of a cell ran every peer once, back to back, so round-i figures of two peers saw the
# same machine; on a guest whose speed drifts by tens of percent between minutes this pairing
# says more than comparing two medians. $a, $b: per-round arrays (relay's, the peer's).
def pairs($a; $b): [range(0; [($a | length), ($b | length)] | min) | select($a[.] != null and $b[.] != null and $a[.] > 0 and $b[.] > 0) | [$a[.], $b[.]]];
def won($p; $better): ($p | map(select(if $better == "higher" then .[0] > .[1] else .[0] < .[1] end)) | length | tostring) + " of " + ($p | length | tostring);
def pratio($p): if ($p | length) == 0 then "–" else ($p | map(.[1] / .[0]) | median | fixed(2)) + "×" end;
# The median of one figure over a cell's runs, each figure on its own (the main table shows
# the run that was the median by msgs/s, whose p99 or CPU may be that run's outlier). A failed
# run counts as 0 msgs/s, as in the main table, and has no latency or CPU figure.
def runs_median($k): (.[$k] // []) | if $k == "runs_msgs_per_s" then map(. // 0) else map(select(. != null and . > 0)) end | median;
def good: .ok == true or (.msgs_per_s // 0) > 0 or (.held // 0) > 0;
# Where loopback ran the receive path (bench-compare.sh --rx-cpu); runs before the option: sender.
def rx: .rx_cpu // "sender";
def rxtitle:
  if . == "receiver" then "receive path on the receiving process's CPU (`--rx-cpu receiver`: RFS on lo, so each process pays for its own sockets' TCP receive and wake-ups, as on a host whose NIC queues are steered to the reading CPU)"
  else "receive path on the sending CPU (`--rx-cpu sender`, the kernel's loopback default: the load generator's and origin's CPU runs the TCP receive and the wake-up of the proxy's sockets, so part of the proxy's cost lands on CPU 1)" end;

.results as $all
| def ref($r; $peer): ($all | map(select(.cell == $r.cell and rx == ($r | rx) and .peer == $peer and good)) | first) // {};
([$all[] | select(.kind == "throughput") | rx] | unique | sort_by(if . == "sender" then 0 else 1 end)) as $modes
| ([$all[] | select(.kind == "idle")] | group_by(.connections) | map(.[0].cell)) as $icells
| ($modes[] as $mode
  | ([$all[] | select(.kind == "throughput" and rx == $mode)] | group_by(.connections, .inflight, .size) | map(.[0].cell)) as $tcells
  | (
    "#### Throughput, \($mode | rxtitle)\n",
    "Closed loop: each connection keeps `inflight` messages of `size` bytes in flight; a message = one echo, i.e. one frame each way through the proxy.\n",
    "| cell conns×inflight×size | peer | msgs/s | ×direct | ×relay | RTT p50 µs | p99 µs | p99.9 µs | p50 ×direct | p99 ×direct | p99 ×relay | p99.9 ×relay | proxy CPU-µs/msg | ×relay | proxy CPU | notes |",
    "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ($tcells[] as $c | $all[] | select(.kind == "throughput" and .cell == $c and rx == $mode)
      | . as $r | ref($r; "direct") as $d | ref($r; "relay") as $rl
      | if good then
          "| \(.cell) | \(.peer) | \(.msgs_per_s | si) | \(ratio(.msgs_per_s; $d.msgs_per_s)) | \(ratio(.msgs_per_s; $rl.msgs_per_s)) | \(.rtt_us.p50 | us) | \(.rtt_us.p99 | us) | \(.rtt_us.p999 | us) | \(ratio(.rtt_us.p50; $d.rtt_us.p50)) | \(ratio(.rtt_us.p99; $d.rtt_us.p99)) | \(ratio(.rtt_us.p99; $rl.rtt_us.p99)) | \(ratio(.rtt_us.p999; $rl.rtt_us.p999)) | \(.proxy_cpu_us_per_msg | if . == null then "–" else fixed(3) end) | \(ratio(.proxy_cpu_us_per_msg; $rl.proxy_cpu_us_per_msg)) | \(.proxy_cpu_pct | if . == null then "–" else fixed(0) + " %" end) | \(note) |"
        else
          "| \(.cell) | \(.peer) | FAILED | | | | | | | | | | | | | \(note) |"
        end),
    "",
    (if ([$all[] | select(.kind == "throughput" and rx == $mode and .peer == "relay" and ((.runs_cpu_us_per_msg // []) | length) > 1)] | length) > 0 then
      "Round by round, same receive path: each round runs every peer once, back to back; \"relay ahead\" counts the rounds in which relay had more msgs/s, less proxy CPU per message, a lower p99. Ratios: the median over rounds of the peer's figure ÷ relay's in that round.\n",
      "| cell | peer | rounds relay ahead: msgs/s | CPU-µs/msg | p99 | msgs/s ×relay | CPU-µs/msg ×relay | p99 ×relay |",
      "|---|---|--:|--:|--:|--:|--:|--:|",
      ($tcells[] as $c | ($all | map(select(.kind == "throughput" and .cell == $c and rx == $mode and .peer == "relay")) | first) as $rl
        | select($rl != null and (($rl.runs_cpu_us_per_msg // []) | length) > 1)
        | $all[] | select(.kind == "throughput" and .cell == $c and rx == $mode and .peer != "relay" and .peer != "direct" and good)
        | pairs($rl.runs_msgs_per_s; .runs_msgs_per_s) as $m
        | pairs($rl.runs_cpu_us_per_msg; .runs_cpu_us_per_msg // []) as $u
        | pairs($rl.runs_p99_us; .runs_p99_us // []) as $l
        | "| \($c) | \(.peer) | \(won($m; "higher")) | \(won($u; "lower")) | \(won($l; "lower")) | \(pratio($m)) | \(pratio($u)) | \(pratio($l)) |"),
      "",
      "Each figure's own median over the runs (above: the run that was the median by msgs/s).\n",
      "| cell | peer | median msgs/s | ×relay | median CPU-µs/msg | ×relay | median p99 µs | ×relay |",
      "|---|---|--:|--:|--:|--:|--:|--:|",
      ($tcells[] as $c | $all[] | select(.kind == "throughput" and .cell == $c and rx == $mode and good)
        | ref(.; "relay") as $rl
        | ($rl | runs_median("runs_msgs_per_s")) as $rm | ($rl | runs_median("runs_cpu_us_per_msg")) as $ru | ($rl | runs_median("runs_p99_us")) as $rp
        | runs_median("runs_msgs_per_s") as $m | runs_median("runs_cpu_us_per_msg") as $u | runs_median("runs_p99_us") as $p
        | "| \($c) | \(.peer) | \($m | si) | \(ratio($m; $rm)) | \($u | if . == null then "–" else fixed(3) end) | \(ratio($u; $ru)) | \($p | us) | \(ratio($p; $rp)) |"),
      ""
    else empty end)
  )),
  (if ($icells | length) > 0 then
    "#### Idle connections (opened with `load --mode hold --rate 0`, then held; memory sampled once all are open)\n",
    "| cell | peer | held | processes proxy/origin/load | new conn/s | ×direct | ×relay | proxy CPU-µs/conn | ×relay | proxy user B/conn | ×relay | kernel B/conn (all sockets) | ×direct | ×relay | notes |",
    "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ($icells[] as $c | $all[] | select(.kind == "idle" and .cell == $c)
      | . as $r | ref($r; "direct") as $d | ref($r; "relay") as $rl
      | if good then
          "| \(.cell) | \(.peer) | \(.held) | \(.processes.proxy)/\(.processes.origin)/\(.processes.load) | \(.connect_rate_per_s | si) | \(ratio(.connect_rate_per_s; $d.connect_rate_per_s)) | \(ratio(.connect_rate_per_s; $rl.connect_rate_per_s)) | \(.proxy_cpu_us_per_conn | us) | \(ratio(.proxy_cpu_us_per_conn; $rl.proxy_cpu_us_per_conn)) | \(.proxy_user_bytes_per_conn | if . == null then "–" else fixed(0) end) | \(ratio(.proxy_user_bytes_per_conn; $rl.proxy_user_bytes_per_conn)) | \(.kernel_bytes_per_conn | if . == null then "–" else fixed(0) end) | \(ratio(.kernel_bytes_per_conn; $d.kernel_bytes_per_conn)) | \(ratio(.kernel_bytes_per_conn; $rl.kernel_bytes_per_conn)) | \(note) |"
        else
          "| \(.cell) | \(.peer) | FAILED | | | | | | | | | | | | \(note) |"
        end),
    ""
  else empty end)
