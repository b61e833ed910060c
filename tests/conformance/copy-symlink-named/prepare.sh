ln -s a.txt link-to-file
ln -s dir link-to-dir
ln -s ../b.txt nested/link-up
