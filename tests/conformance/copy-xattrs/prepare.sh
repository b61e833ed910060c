/usr/bin/python3 -c 'import os; os.setxattr("tagged", "user.color", b"blue"); os.setxattr("dir/inner", "user.k", b"v")'
