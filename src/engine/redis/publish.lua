-- Records and publishes one relayhub message atomically.
-- KEYS[1] sequence counter, KEYS[2] latest value, KEYS[3] snapshot list
-- ARGV[1] data (JSON), ARGV[2] timestamp, ARGV[3] ttl seconds, ARGV[4] snapshots kept, ARGV[5] pub/sub channel
-- Returns {seq, number of pub/sub receivers}.
local seq = redis.call('INCR', KEYS[1])
local ttl = tonumber(ARGV[3])
-- The counter lives as long as the channel's longest-lived value: extended, never shortened, so a publish
-- with a shorter TTL (a polling source's) cannot make the sequence start over while a longer value is cached.
-- Always the same two commands, so the Redis work per publish does not depend on the key's state.
redis.call('EXPIRE', KEYS[1], math.max(ttl, redis.call('TTL', KEYS[1])))
redis.call('SET', KEYS[2], ARGV[1], 'EX', ttl)
local keep = tonumber(ARGV[4])
if keep > 0 then
  redis.call('LPUSH', KEYS[3], '{"seq":' .. seq .. ',"ts":"' .. ARGV[2] .. '","data":' .. ARGV[1] .. '}')
  redis.call('LTRIM', KEYS[3], 0, keep - 1)
  redis.call('EXPIRE', KEYS[3], ttl)
end
-- \30 is byte 0x1E, the envelope mark: raw JSON never starts with it.
local receivers = redis.call('PUBLISH', ARGV[5], '\30' .. seq .. ' ' .. ARGV[2] .. ' ' .. ARGV[1])
return {seq, receivers}
