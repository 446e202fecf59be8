-- Adds (or refreshes) members of one channel's presence and announces the new ones that ask for it; first
-- prunes the members that expired (a refresh thus announces the leaving of a dead replica's members).
-- ARGV[1] presence_ttl in ms, ARGV[2] the channel's pub/sub channel, ARGV[3] '1' when the namespace has
-- join_leave, then four per member: its connection id, its user ('' for an anonymous connection), its JSON,
-- and the `join` announcement to publish ('' for none: a refresh, or a namespace without join_leave).
local ttl = tonumber(ARGV[1])
if ARGV[3] == '1' then
  prune(ARGV[2])
else
  prune('')
end
local expires = now_ms() + ttl
for i = 4, #ARGV, 4 do
  local client, user, member, announcement = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if redis.call('HSET', KEYS[1], client, member) == 1 and user ~= '' then
    redis.call('HINCRBY', KEYS[3], user, 1)
  end
  redis.call('ZADD', KEYS[2], expires, client)
  if announcement ~= '' then
    redis.call(PUBLISH, ARGV[2], announcement)
  end
end
-- The keys outlive every member in them: a channel nobody refreshes any more disappears whole.
for i = 1, 3 do
  redis.call('PEXPIRE', KEYS[i], ttl)
end
return 0
