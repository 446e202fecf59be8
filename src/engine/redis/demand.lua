-- The fleet-wide demand for polling jobs: each replica records how many subscribers (exact and pattern) of
-- each job's channel it has, with an expiry, and every replica's live counts are summed.
-- KEYS: one demand hash per job (field: replica id, value: `<expiry ms> <count>`). ARGV[1] this replica's id,
-- ARGV[2] how long its counts hold (ms), ARGV[2 + i] its count for KEYS[i] ('' to read only).
-- Returns, per job, the sum of the counts that have not expired (expired ones are removed: a replica that
-- died stops counting within ARGV[2]).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local hold = tonumber(ARGV[2])
local sums = {}
for i, key in ipairs(KEYS) do
  local count = ARGV[i + 2] or ''
  if count == '0' then
    redis.call('HDEL', key, ARGV[1])
  elseif count ~= '' then
    redis.call('HSET', key, ARGV[1], (now + hold) .. ' ' .. count)
    redis.call('PEXPIRE', key, hold)
  end
  local sum = 0
  local replicas = redis.call('HKEYS', key)
  if #replicas > 0 then
    local values = redis.call('HMGET', key, unpack(replicas))
    for j, replica in ipairs(replicas) do
      local expires, n = string.match(values[j] or '', '^(%d+) (%d+)$')
      if expires and tonumber(expires) > now then
        sum = sum + tonumber(n)
      else
        redis.call('HDEL', key, replica)
      end
    end
  end
  sums[i] = sum
end
return sums
