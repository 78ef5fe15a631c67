-- wrk script for bench/wrk_load.py: POST one chat request per call, each with its own text.
--
-- Settings come from the environment (wrk passes extra arguments, but env keeps quoting simple):
--   WRK_PATH     request path, e.g. /v1/chat/completions
--   WRK_BODY     the JSON body with the placeholder @@N@@ where the request number goes
--   WRK_EXPECT   byte strings every complete answer contains, separated by "\n"
--   WRK_THREADS  the -t value, so request numbers stay distinct across threads
--   WRK_FIRST    the first request number (each run gets its own range)
--   WRK_HEADER   optional "Name: value" every complete answer carries (LeMoE's chosen expert)
--
-- Every body differs ("... (17)"): a server that caches routing decisions per text must still
-- route each one. An answer counts as an error when its status is not 200 or a piece of
-- WRK_EXPECT is missing. `done` prints one JSON line starting with "WRKJSON " for the caller.

local path = os.getenv("WRK_PATH")
local template = os.getenv("WRK_BODY")
local expect = {}
for piece in string.gmatch(os.getenv("WRK_EXPECT") or "", "[^\n]+") do
  expect[#expect + 1] = piece
end
local step = tonumber(os.getenv("WRK_THREADS") or "1")
local first_number = tonumber(os.getenv("WRK_FIRST") or "0")
local header_name, header_value = string.match(os.getenv("WRK_HEADER") or "", "^([^:]+):%s*(.-)$")
if header_name then header_name = string.lower(header_name) end
local headers = { ["Content-Type"] = "application/json" }

local threads = {}

function setup(thread)
  thread:set("id", #threads)
  threads[#threads + 1] = thread
end

-- Per-thread state (each wrk thread has its own Lua state). Globals, as `done` reads them
-- from the main state with thread:get.
counter = 0
bad_status = 0
incomplete = 0
first_error = ""

function init(args)
  -- Numbers stay distinct across threads: thread i sends i + n, i + 2n, ...
  counter = first_number + id
end

function request()
  counter = counter + step
  local body = string.gsub(template, "@@N@@", tostring(counter), 1)
  return wrk.format("POST", path, headers, body)
end

function response(status, hdrs, body)
  if status ~= 200 then
    bad_status = bad_status + 1
    if first_error == "" then first_error = "HTTP " .. status .. ": " .. string.sub(body or "", 1, 200) end
    return
  end
  if header_name then
    local value = nil
    for name, v in pairs(hdrs) do
      if string.lower(name) == header_name then value = v end
    end
    if value ~= header_value then
      incomplete = incomplete + 1
      if first_error == "" then first_error = "header " .. header_name .. ": " .. tostring(value) end
      return
    end
  end
  for _, piece in ipairs(expect) do
    if not string.find(body, piece, 1, true) then
      incomplete = incomplete + 1
      if first_error == "" then first_error = "incomplete answer: " .. string.sub(body, -200) end
      return
    end
  end
end

local function quote(text)
  text = string.gsub(text, '[%c"\\]', function(c) return string.format("\\u%04x", string.byte(c)) end)
  return '"' .. text .. '"'
end

function done(summary, latency, requests)
  local bad, short, first = 0, 0, ""
  for _, thread in ipairs(threads) do
    bad = bad + thread:get("bad_status")
    short = short + thread:get("incomplete")
    if first == "" then first = thread:get("first_error") end
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bad_status":%d,"incomplete":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"timeout":%d,"status":%d,' ..
    '"p50_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d,"first_error":%s}\n',
    summary.requests, summary.duration, bad, short, e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency.mean, latency.max, quote(first)))
end
