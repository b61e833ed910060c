# Debian's BuildKit has no --link: the same files without it.
FROM BASE
COPY a.txt /linked/a.txt
COPY dir /linked-dir
