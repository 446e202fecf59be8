-- Removes members from one channel's presence and announces their leaving where asked.
-- ARGV[1] the channel's pub/sub channel, then two per member: its connection id and the `leave`
-- announcement to publish ('' for none).
for i = 2, #ARGV, 2 do
  forget(ARGV[i])
  if ARGV[i + 1] ~= '' then
    redis.call(PUBLISH, ARGV[1], ARGV[i + 1])
  end
end
return 0
