# Debian's BuildKit cannot parse heredocs: the same steps without them.
FROM BASE
ENV WHO=world
RUN echo one > /one && echo "hello $WHO" > /two
COPY expanded literal /
