# Debian's BuildKit cannot parse heredocs: the same files from the context.
FROM scratch
COPY heredoc-x.txt /out/x.txt
COPY one two /many/
