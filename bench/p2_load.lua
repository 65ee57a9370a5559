-- wrk script of the P2-load benchmark (bench/p2_load.py sets the environment).
--   P2_BODIES        file of JSON bodies, one per line (cycled, each thread from its own offset)
--   P2_PATH          request path (/rank, /get-online-features)
--   P2_INTERVAL_MS   this thread's interval between requests at a constant rate (0: closed loop, no pacing)
--   P2_MAX_REQUESTS  requests per wrk thread at most (the run also ends at -d seconds)
--   P2_THREADS       wrk's -t (the threads' schedules start out of phase)
-- done() prints one JSON line: requests, req/s, latency percentiles (ms), errors, and how late the paced
-- requests left against their schedule.
--
-- Pacing as wrk2 does it (wrk2 is not packaged): each thread owns a schedule of send times, one every
-- P2_INTERVAL_MS; a connection ready to send takes the next time on it and waits until then, or sends at once
-- when the schedule is already past (the server fell behind). wrk times a request from when it is written,
-- so a server that falls behind delays the schedule instead of the latencies (coordinated omission); the
-- lateness is reported (late_p99_ms, late_max_ms) so such a point can be told from an honest one.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } p2_timespec;
int clock_gettime(int clock_id, p2_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local timespec = ffi.new("p2_timespec")
local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, timespec)
  return tonumber(timespec.tv_sec) * 1e3 + tonumber(timespec.tv_nsec) / 1e6
end

local bodies = {}
for line in io.lines(os.getenv("P2_BODIES")) do
  bodies[#bodies + 1] = line
end
local path = os.getenv("P2_PATH")
local interval_ms = tonumber(os.getenv("P2_INTERVAL_MS")) or 0
local max_requests = tonumber(os.getenv("P2_MAX_REQUESTS")) or 1000000
local thread_count = tonumber(os.getenv("P2_THREADS")) or 1
local headers = { ["Content-Type"] = "application/json" }

local counter = 0
local threads = {}

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  threads[#threads + 1] = thread
end

local next_body, sent, non_2xx = 1, 0, 0
local next_slot = nil -- the schedule's next send time (ms, monotonic clock)
local claimed = {} -- send times taken by delay(), in order, until their request() is written
local first_claimed, last_claimed = 1, 0
lateness = {} -- ms each paced request left after its scheduled time (read by done() through thread:get)

function init(args)
  next_body = (id * 97) % #bodies + 1
end

function request()
  sent = sent + 1
  if first_claimed <= last_claimed then
    -- Timers fire in the order of their send times, so the oldest claimed time is this request's.
    lateness[#lateness + 1] = math.max(0, now_ms() - claimed[first_claimed])
    claimed[first_claimed] = nil
    first_claimed = first_claimed + 1
  end
  local body = bodies[next_body]
  next_body = next_body % #bodies + 1
  return wrk.format("POST", path, headers, body)
end

function delay()
  if interval_ms <= 0 then
    return 0
  end
  local now = now_ms()
  if next_slot == nil then
    next_slot = now + interval_ms * id / thread_count -- threads start out of phase
  end
  local slot = next_slot
  next_slot = next_slot + interval_ms
  last_claimed = last_claimed + 1
  claimed[last_claimed] = slot
  return math.max(0, math.floor(slot - now + 0.5))
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non_2xx = non_2xx + 1
  end
  if sent >= max_requests then
    wrk.thread:stop()
  end
end

local function percentile(sorted, q)
  if #sorted == 0 then
    return 0
  end
  return sorted[math.max(1, math.ceil(q / 100 * #sorted))]
end

function done(summary, latency, requests)
  local errors = summary.errors
  local seconds = summary.duration / 1e6
  local late = {}
  for _, thread in ipairs(threads) do
    for _, ms in ipairs(thread:get("lateness")) do
      late[#late + 1] = ms
    end
  end
  table.sort(late)
  io.write(string.format(
    '{"requests": %d, "seconds": %.3f, "rps": %.1f, "p50_ms": %.3f, "p90_ms": %.3f, "p99_ms": %.3f, '
      .. '"max_ms": %.3f, "errors": %d, "non_2xx": %d, "socket_errors": %d, "paced": %d, '
      .. '"late_p99_ms": %.3f, "late_max_ms": %.3f}\n',
    summary.requests, seconds, summary.requests / seconds,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, errors.status + errors.connect + errors.read + errors.write + errors.timeout,
    errors.status, errors.connect + errors.read + errors.write + errors.timeout,
    #late, percentile(late, 99), late[#late] or 0
  ))
end
