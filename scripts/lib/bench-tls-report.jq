# Markdown table of a scripts/bench-tls.sh JSON file: one row per figure, relay and HAProxy
# side by side, and relay / HAProxy. Run as: jq -r -f bench-tls-report.jq FILE
def r(n): if . == null then null else (. * pow(10; n) | round) / pow(10; n) end;
def fmt: if . == null then "–"
  elif (type == "number") then
    (if . >= 1000 then (round | tostring | [scan("\\d")] | reverse | [range(0; length; 3) as $i | .[$i:$i+3] | reverse | join("")] | reverse | join(","))
     elif . >= 100 then (round | tostring)
     elif . >= 10 then (r(1) | tostring)
     else (r(2) | tostring) end)
  else tostring end;
def cellof($c; $p): (.results | map(select(.cell == $c and .peer == $p)) | first) // null;
def val($c; $p; f): cellof($c; $p) as $x | if $x == null then null elif ($x.ok | not) then "failed" else ($x | f) end;
def ratio($a; $b): if ($a | type) == "number" and ($b | type) == "number" and $b != 0 then ($a / $b | r(2) | tostring) + "×" else "–" end;
def row($c; $what; f):
  val($c; "relay"; f) as $a | val($c; "haproxy"; f) as $b
  | "| \($c) | \($what) | \($a | fmt) | \($b | fmt) | \(ratio($a; $b)) |";
. as $all
| ([.results[] | .cell] | unique) as $cells
| "| cell | figure | relay | HAProxy | relay ÷ HAProxy |",
  "|------|--------|------:|--------:|----------------:|",
  (["hs-full", "hs-resume", "hs-c1"][] as $c | select($cells | index($c)) |
    row($c; "connections/s"; .conns_per_s),
    row($c; "proxy CPU-µs per connection"; .proxy_cpu_us_per_conn),
    row($c; "TLS handshake p50 µs (client view)"; .tls_handshake_us.p50),
    row($c; "TLS handshake p99 µs"; .tls_handshake_us.p99),
    row($c; "resumed handshakes %"; .resumed_share * 100),
    row($c; "proxy CPU % (other work on CPU 0 %)"; "\(.proxy_cpu_pct) (\(.other_cpu0_pct // "–"))")),
  (["tput-32", "tput-4096"][] as $c | select($cells | index($c)) |
    row($c; "messages/s"; .msgs_per_s),
    row($c; "proxy CPU-µs per message"; .proxy_cpu_us_per_msg),
    row($c; "RTT p50 µs"; .rtt_us.p50),
    row($c; "RTT p99 µs"; .rtt_us.p99),
    row($c; "proxy CPU % (other work on CPU 0 %)"; "\(.proxy_cpu_pct) (\(.other_cpu0_pct // "–"))")),
  (["idle"][] as $c | select($cells | index($c)) |
    row($c; "connections held"; .held),
    row($c; "proxy user-space bytes per connection (VmRSS delta)"; .proxy_user_bytes_per_conn),
    row($c; "kernel slab bytes per connection (all sockets, machine-wide)"; .kernel_slab_bytes_per_conn),
    row($c; "proxy CPU-µs per connection during the ramp"; .proxy_cpu_us_per_conn),
    row($c; "ramp connections/s"; .connect_rate_per_s)),
  ( [.results[] | select(.ok | not) | "- \(.cell) \(.peer): \(.error)"] as $f
    | if ($f | length) > 0 then "", "Failed or skipped:", $f[] else empty end )
