-- One turn of a fleet-wide request budget (GCRA): requests are spaced `interval` apart, with no burst.
-- KEYS[1] the budget's theoretical arrival time (ms, Redis clock)
-- ARGV[1] interval between requests (ms)
-- Returns 0 when the request may go now (its turn is taken), else how many ms to wait before asking again.
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat > now then
  return tat - now
end
redis.call('SET', KEYS[1], now + interval, 'PX', interval + 1000)
return 0
