chmod 600 private
chmod 755 exec
chmod 4755 suid
chmod 444 ro
chmod 700 dirs/private
chmod 2775 dirs/sgid
chmod 1777 dirs/sticky
