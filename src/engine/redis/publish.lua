-- Records and publishes one relayhub message atomically.
-- KEYS[1] sequence counter, KEYS[2] latest value, KEYS[3] snapshot list (the channel's history), KEYS[4] epoch
-- ARGV[1] data (JSON), ARGV[2] timestamp, ARGV[3] ttl seconds, ARGV[4] snapshots kept, ARGV[5] pub/sub channel,
-- ARGV[6] a fresh epoch, used when the channel has none, ARGV[7] the fetch time of a polled value ('' or
-- absent for none, so a caller that passes six arguments still works), ARGV[8] '0' to leave the latest value
-- alone (an [[ingest]] route without `cache`; absent or anything else: set it), ARGV[9] 's' in cluster mode:
-- the message goes out with SPUBLISH (sharded pub/sub, on the channel's slot like the keys above)
-- Returns {seq, number of pub/sub receivers}.
local fetched_at = ARGV[7] or ''
local seq = redis.call('INCR', KEYS[1])
local ttl = tonumber(ARGV[3])
-- The counter lives as long as the channel's longest-lived value: extended, never shortened, so a publish
-- with a shorter TTL (a polling source's) cannot make the sequence start over while a longer value is cached.
-- Always the same commands, so the Redis work per publish does not depend on the key's state.
local keep_for = math.max(ttl, redis.call('TTL', KEYS[1]))
redis.call('EXPIRE', KEYS[1], keep_for)
-- The epoch names this run of sequence numbers: it lives exactly as long as the counter, so a counter that
-- starts over (expired, flushed, a restart without persistence) starts under a new epoch.
local epoch = redis.call('GET', KEYS[4]) or ARGV[6]
redis.call('SET', KEYS[4], epoch, 'EX', keep_for)
if ARGV[8] ~= '0' then
  redis.call('SET', KEYS[2], ARGV[1], 'EX', ttl)
end
local keep = tonumber(ARGV[4])
if keep > 0 then
  local fetched = ''
  if fetched_at ~= '' then
    fetched = ',"fetched_at":"' .. fetched_at .. '"'
  end
  redis.call('LPUSH', KEYS[3], '{"seq":' .. seq .. ',"ts":"' .. ARGV[2] .. '"' .. fetched .. ',"data":' .. ARGV[1] .. '}')
  redis.call('LTRIM', KEYS[3], 0, keep - 1)
  redis.call('EXPIRE', KEYS[3], ttl)
end
-- \30 is byte 0x1E, the envelope mark: raw JSON never starts with it. \31 (0x1F) marks an envelope that
-- also carries the fetch time.
local envelope
if fetched_at ~= '' then
  envelope = '\31' .. seq .. ' ' .. ARGV[2] .. ' ' .. fetched_at .. ' ' .. ARGV[1]
else
  envelope = '\30' .. seq .. ' ' .. ARGV[2] .. ' ' .. ARGV[1]
end
local publish = 'PUBLISH'
if ARGV[9] == 's' then
  publish = 'SPUBLISH'
end
local receivers = redis.call(publish, ARGV[5], envelope)
return {seq, receivers}
