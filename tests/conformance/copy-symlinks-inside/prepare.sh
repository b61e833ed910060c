ln -s file tree/rel
ln -s /etc/passwd tree/abs
ln -s missing tree/dangling
ln -s sub tree/to-dir
ln -s ../file tree/sub/up
