-- Replays the requests of a file, one per line: "PATH" or "PATH<TAB>BODY", in order, cycling.
-- Environment: BENCH_REQUESTS (the file), BENCH_METHOD (GET), BENCH_TOKEN (bearer token, optional).
-- Requests are formatted once in init, so the load generator does little per request.
-- done() prints one line "BENCH_JSON {...}" with counts and latency percentiles (microseconds).

local requests = {}
local counter = 0

function init(args)
  local method = os.getenv("BENCH_METHOD") or "GET"
  local token = os.getenv("BENCH_TOKEN")
  local file = assert(io.open(os.getenv("BENCH_REQUESTS"), "r"))
  for line in file:lines() do
    local tab = string.find(line, "\t", 1, true)
    local headers = { ["Accept"] = "application/fhir+json" }
    if token then headers["Authorization"] = "Bearer " .. token end
    if tab then
      headers["Content-Type"] = "application/fhir+json"
      requests[#requests + 1] = wrk.format(method, string.sub(line, 1, tab - 1), headers, string.sub(line, tab + 1))
    else
      requests[#requests + 1] = wrk.format(method, line, headers)
    end
  end
  file:close()
end

function request()
  counter = counter + 1
  return requests[((counter - 1) % #requests) + 1]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50":%d,"p90":%d,"p95":%d,"p99":%d,"max":%d,"mean":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(95), latency:percentile(99),
    latency.max, latency.mean))
end
