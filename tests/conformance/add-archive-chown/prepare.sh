mkdir -p src/dir && echo one > src/one && echo two > src/dir/two && ln -s one src/link
chmod 640 src/one && chmod 750 src/dir
tar --owner=1234 --group=5678 --numeric-owner -C src -cf a.tar .
gzip -c a.tar > a.tar.gz
bzip2 -c a.tar > a.tar.bz2
xz -c a.tar > a.tar.xz
cp a.tar.gz renamed.bin
echo "not an archive" | gzip -c > notar.gz
rm -r src
