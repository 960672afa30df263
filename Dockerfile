# The prompt-tasks image: every role of the fleet runs from it (see docker-compose.yml).
#   docker build -t prompt-tasks .
#   docker run --rm prompt-tasks prompt-tasks worker detector
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Metadata first, so a code change does not re-resolve the dependencies' layer needlessly.
COPY pyproject.toml setup.cfg README.md ./
COPY beat_schedule.py ./
COPY workers ./workers
COPY prompt_tasks ./prompt_tasks
RUN pip install . && pip check

RUN useradd --create-home --uid 10001 prompt \
    && mkdir -p /var/lib/prompt-tasks /repo \
    && chown prompt /var/lib/prompt-tasks /repo
USER prompt
WORKDIR /var/lib/prompt-tasks

# In a container the servers listen on every interface; state stays in the container.
ENV PROMPT_TASKS_STATE_DIR=/var/lib/prompt-tasks \
    PROMPT_TASKS_HOST=0.0.0.0

CMD ["prompt-tasks", "--help"]
