# Debian's BuildKit has no --exclude: the same files named one by one.
FROM BASE AS src
RUN mkdir -p /out/dir/skip /out/dir/keep && echo a > /out/a.txt && echo b > /out/b.log \
    && echo k > /out/dir/keep/k && echo s > /out/dir/skip/s && echo l > /out/dir/keep/x.log

FROM BASE
COPY --from=src /out/a.txt /copied/
COPY --from=src /out/dir/keep/k /copied/dir/keep/k
