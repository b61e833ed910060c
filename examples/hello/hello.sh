#!/bin/sh
echo "hello from a MemoBuild RUN step on $(uname -m), built as uid $(id -u)"
