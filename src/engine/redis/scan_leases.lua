-- One scan's lease work in one call, whatever the number of jobs: renews the leases this replica holds and
-- tries to take the free ones.
-- KEYS: n lease keys, then the n jobs' refresh-request keys in the same order. ARGV[1] this replica's id,
-- ARGV[2] lease in ms, ARGV[2 + i] `r` (renew, only if held by this replica) or `t` (take, only if nobody
-- holds it) for KEYS[i].
-- Returns one integer per job: 1 when this replica holds the lease now, 2 when it holds it and a refresh was
-- requested (the request is taken: deleted), 0 when it does not hold it.
local held = {}
local n = #KEYS / 2
for i = 1, n do
  local key = KEYS[i]
  local ok = 0
  if ARGV[i + 2] == 'r' then
    if redis.call('GET', key) == ARGV[1] then
      ok = redis.call('PEXPIRE', key, ARGV[2])
      if ok == 1 and redis.call('DEL', KEYS[n + i]) == 1 then
        ok = 2
      end
    end
  elseif redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) then
    ok = 1
  end
  held[i] = ok
end
return held
