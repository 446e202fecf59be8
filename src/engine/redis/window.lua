-- Reads where a channel's numbering stands and what history it holds, in one atomic step.
-- KEYS[1] sequence counter, KEYS[2] epoch, KEYS[3] latest value, KEYS[4] snapshot list
-- ARGV[1] a fresh epoch, used when the channel has none; ARGV[2] entries to read; ARGV[3] ttl seconds
-- Returns {epoch, seq, latest value or false, {history entries, newest first}}.
local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  -- No epoch yet (or it went with the counter): this one is the channel's from now on, for every replica.
  epoch = ARGV[1]
  local ttl = redis.call('TTL', KEYS[1])
  if ttl < 1 then
    ttl = tonumber(ARGV[3])
  end
  redis.call('SET', KEYS[2], epoch, 'EX', ttl)
end
local history = {}
local n = tonumber(ARGV[2])
if n > 0 then
  history = redis.call('LRANGE', KEYS[4], 0, n - 1)
end
return {epoch, seq, redis.call('GET', KEYS[3]), history}
