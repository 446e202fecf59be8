-- One scan's lease work in one call, whatever the number of jobs: renews the leases this replica holds and
-- tries to take the free ones.
-- KEYS: lease keys. ARGV[1] this replica's id, ARGV[2] lease in ms, ARGV[2 + i] `r` (renew, only if held by
-- this replica) or `t` (take, only if nobody holds it) for KEYS[i].
-- Returns one integer per key: 1 when this replica holds the lease now, 0 when it does not.
local held = {}
for i, key in ipairs(KEYS) do
  local ok = 0
  if ARGV[i + 2] == 'r' then
    if redis.call('GET', key) == ARGV[1] then
      ok = redis.call('PEXPIRE', key, ARGV[2])
    end
  elseif redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) then
    ok = 1
  end
  held[i] = ok
end
return held
