ln -s a.txt link-a
ln -s /b.txt link-abs
