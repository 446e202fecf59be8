-- Shared by the presence scripts (prepended to each, after the line that sets PUBLISH: 'PUBLISH', or
-- 'SPUBLISH' in cluster mode, where the channel's pub/sub channel is a sharded one). KEYS[1] members (hash: connection id -> member JSON),
-- KEYS[2] expiries (sorted set: connection id scored by expiry, ms since the Unix epoch), KEYS[3] users (hash:
-- user -> members of that user).

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Forgets one member: its entry, its expiry and its share of its user's count.
local function forget(client)
  redis.call('ZREM', KEYS[2], client)
  local member = redis.call('HGET', KEYS[1], client)
  if not member then
    return
  end
  redis.call('HDEL', KEYS[1], client)
  local ok, decoded = pcall(cjson.decode, member)
  if ok and type(decoded) == 'table' and type(decoded.user) == 'string' then
    if redis.call('HINCRBY', KEYS[3], decoded.user, -1) <= 0 then
      redis.call('HDEL', KEYS[3], decoded.user)
    end
  end
end

-- Forgets the members whose replica stopped refreshing them (it died, or lost Redis for presence_ttl); with
-- a pub/sub channel (not ''), announces each one's `leave` there, since their replica never will. The member
-- is gone once this runs, so exactly one script announces it.
local function prune(announce_to)
  local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms())
  for _, client in ipairs(expired) do
    local member = redis.call('HGET', KEYS[1], client)
    forget(client)
    if member and announce_to ~= '' then
      redis.call(PUBLISH, announce_to, '\29l' .. client .. ' ' .. member)
    end
  end
end
