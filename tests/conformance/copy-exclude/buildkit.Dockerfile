# Debian's BuildKit has no --exclude: the same files named one by one.
FROM BASE
COPY a.txt /ctx/
COPY dir/keep /ctx/dir/keep
