-- Takes or renews the lease of an [[ingest]] route: the replica holding it is the one that takes the route's
-- messages into the sequenced path (the publish script), so each message is numbered once for the fleet.
-- KEYS[1] the lease, ARGV[1] this replica's instance id, ARGV[2] the lease in ms, ARGV[3] 'release' to hand
-- it back (a replica shutting down; only its own lease is deleted)
-- Returns 1 when this replica holds the lease now (released: held it until now), 0 when another one does.
local holder = redis.call('GET', KEYS[1])
if ARGV[3] == 'release' then
  if holder == ARGV[1] then
    redis.call('DEL', KEYS[1])
    return 1
  end
  return 0
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
