-- wrk script of the P2-load benchmark (bench/p2_load.py sets the environment).
--   P2_BODIES        file of JSON bodies, one per line (cycled, each thread from its own offset)
--   P2_PATH          request path (/rank, /get-online-features)
--   P2_DELAY_MS      mean pause of a connection between requests (0: closed loop, no pause)
--   P2_MAX_REQUESTS  requests per wrk thread at most (the run also ends at -d seconds)
-- done() prints one JSON line: requests, req/s, latency percentiles (ms), errors.

local bodies = {}
for line in io.lines(os.getenv("P2_BODIES")) do
  bodies[#bodies + 1] = line
end
local path = os.getenv("P2_PATH")
local delay_ms = tonumber(os.getenv("P2_DELAY_MS")) or 0
local max_requests = tonumber(os.getenv("P2_MAX_REQUESTS")) or 1000000
local headers = { ["Content-Type"] = "application/json" }

local counter = 0
local threads = {}

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  threads[#threads + 1] = thread
end

local next_body, sent, non_2xx = 1, 0, 0

function init(args)
  next_body = (id * 97) % #bodies + 1
  math.randomseed(id + 1)
end

function request()
  sent = sent + 1
  local body = bodies[next_body]
  next_body = next_body % #bodies + 1
  return wrk.format("POST", path, headers, body)
end

function delay()
  if delay_ms <= 0 then
    return 0
  end
  return math.random() * 2 * delay_ms -- uniform around the mean: connections do not march in step
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non_2xx = non_2xx + 1
  end
  if sent >= max_requests then
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local errors = summary.errors
  local seconds = summary.duration / 1e6
  io.write(string.format(
    '{"requests": %d, "seconds": %.3f, "rps": %.1f, "p50_ms": %.3f, "p90_ms": %.3f, "p99_ms": %.3f, '
      .. '"max_ms": %.3f, "errors": %d, "non_2xx": %d, "socket_errors": %d}\n',
    summary.requests, seconds, summary.requests / seconds,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, errors.status + errors.connect + errors.read + errors.write + errors.timeout,
    errors.status, errors.connect + errors.read + errors.write + errors.timeout
  ))
end
