-- Lists a channel's live members, at most ARGV[1] of them; ARGV[2] is the pub/sub channel the expired ones'
-- leaves go to ('' for none). Returns {members in the channel, {member JSON...}}.
prune(ARGV[2])
local limit = tonumber(ARGV[1])
local total = redis.call('HLEN', KEYS[1])
if total <= limit then
  return {total, redis.call('HVALS', KEYS[1])}
end
-- More than asked for: read only as many (HSCAN pages) instead of the whole hash.
local members = {}
local cursor = '0'
repeat
  local page = redis.call('HSCAN', KEYS[1], cursor, 'COUNT', 100)
  cursor = page[1]
  local items = page[2]
  for j = 2, #items, 2 do
    if #members < limit then
      members[#members + 1] = items[j]
    end
  end
until cursor == '0' or #members >= limit
return {total, members}
