ln -s a.txt link-a
ln -s /etc/passwd link-abs
