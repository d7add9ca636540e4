# The image of docker-compose.yml's migrate, api and worker services.
# GPU hosts: the default torch wheel from PyPI is the CUDA build.
# CPU-only image: docker build --build-arg CONSTRAINTS="-c constraints/cpu.txt" .
FROM python:3.11-slim
ARG CONSTRAINTS=""
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY constraints ./constraints
COPY training ./training
COPY store ./store
COPY migrations ./migrations
COPY api ./api
COPY worker ./worker
COPY client ./client
COPY config ./config
COPY orchestration ./orchestration
COPY server ./server
COPY ui ./ui
RUN pip install $CONSTRAINTS . && useradd --create-home trainyard && mkdir /data && chown trainyard /data
USER trainyard
VOLUME ["/data"]
EXPOSE 8000
CMD ["trainyard", "api", "--host", "0.0.0.0", "--port", "8000"]
