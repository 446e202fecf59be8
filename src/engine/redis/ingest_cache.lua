-- Records one ingested message as a channel's latest value and newest snapshot, once for the whole fleet:
-- every replica receives the message and calls this; only the first call for the same message writes.
-- KEYS[1] dedupe marker, KEYS[2] latest value, KEYS[3] snapshot list
-- ARGV[1] data (JSON), ARGV[2] ttl seconds, ARGV[3] snapshots kept, ARGV[4] dedupe window in ms
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[4]) then
  return 0
end
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[2], ARGV[1], 'EX', ttl)
local keep = tonumber(ARGV[3])
if keep > 0 then
  redis.call('LPUSH', KEYS[3], '{"seq":null,"ts":null,"data":' .. ARGV[1] .. '}')
  redis.call('LTRIM', KEYS[3], 0, keep - 1)
  redis.call('EXPIRE', KEYS[3], ttl)
end
return 1
